"""Reproduction and performance benchmarks (installed as diredi_secure.benchmarks)."""
