"""The channel graph and its surgery: coupled channel groups found by tracing, removed physically and
checked against masking, and the criteria that score them."""
