"""Benchmarks (``moekit bench SECTION``) and the timing helpers they share."""
