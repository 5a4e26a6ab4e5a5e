"""Data: tokenisation, batching with length buckets, and the data sets."""
