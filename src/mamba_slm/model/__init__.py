"""The model: Mamba mixers, attention, the inference cache and the hybrid LM."""
