"""Conditioning encoders (`modules`) and the offline lookup of the BERT vocabulary (`vocabulary`)."""
