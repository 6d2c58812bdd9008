"""Apps beside the library: the benchmark, planted real-shape pairs, the demos and the few-shot prompt they share.

The library (``langchain_specguard`` and its engine) never imports these; they use it as a user would.
"""
