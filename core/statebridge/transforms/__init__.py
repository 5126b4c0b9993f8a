"""Transforms: small classes that declare their groups (inputs -> outputs) before touching data, and their composition."""
