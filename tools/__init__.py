"""Stand-alone helpers of the benchmark: the hand-written reference circuit and the peer scripts."""
