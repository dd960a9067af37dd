"""The pieces of `rlhfkit loop` (rounds of feedback on the current policy): the labeling server
connection (`labeling`) and the per-round table and report (`report`)."""
