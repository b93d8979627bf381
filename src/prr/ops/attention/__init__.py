from .reference import dense_decode, gather_blocks, sparse_decode

__all__ = ["dense_decode", "gather_blocks", "sparse_decode"]
