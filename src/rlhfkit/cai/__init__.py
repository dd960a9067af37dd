"""Constitutional AI: critique-and-revise demonstrations (phase 1) and AI preference labels (phase 2)."""
