"""Generated modules of the slm_trio.v1 wire contract; do not edit by hand."""
