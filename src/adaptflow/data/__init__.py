"""Data: demo datasets built from scikit-learn's digits, ingest, image decoding and transforms."""
