"""Model builders: the frozen teacher, the assembled student, upcycling, per-component trainability."""
