"""1D image tokenizers (TiTok, One-D-Piece, FlexTok) and their quantizers (VQ, FSQ)."""
