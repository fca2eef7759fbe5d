"""The B-TAP method itself: attribution scores, which weights they select, and pruning those weights
(the mask)."""
