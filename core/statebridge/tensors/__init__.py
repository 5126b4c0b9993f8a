"""Leaf types: what is known about a tensor from headers alone (:mod:`.meta`) and key patterns (:mod:`.patterns`)."""
