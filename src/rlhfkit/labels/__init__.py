"""What the labels say, computed offline from labelers' rankings: preference pairs (with an account
of what was dropped and why), the Bradley-Terry consensus per item, and agreement between labelers.

Plain functions on `rlhfkit.data.formats` records, used by `rlhfkit rm`, `rlhfkit data`, `rlhfkit
aggregate`, the feedback server's exports and the demo. The server imports them only where an
export or a report needs them, so its start-up pays for none of it (numpy, choix).
"""
