"""Research code beside the library: testbeds, training recipes and evaluations (not imported by users)."""
