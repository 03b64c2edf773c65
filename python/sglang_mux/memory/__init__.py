"""The multiplexed memory: radix cache subclass, page tables, tiers."""
