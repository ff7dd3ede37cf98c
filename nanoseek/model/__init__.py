"""The model: one module per paper concept (rope, mla, moe, mtp) composed in transformer.py."""

from nanoseek.model.mla import MLA
from nanoseek.model.moe import GroupedExperts, MoE, Router, Routing, select_experts
from nanoseek.model.mtp import MTPModule
from nanoseek.model.transformer import Transformer

__all__ = ["MLA", "MoE", "Router", "GroupedExperts", "Routing", "select_experts", "MTPModule", "Transformer"]
