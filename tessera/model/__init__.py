"""The unified autoregressive model: extended vocabulary, visual interfaces, MoT, packing, generation."""
