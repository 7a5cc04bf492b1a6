"""One file per stage. Each defines a validated config dataclass and ``run(cfg, ctx) -> metrics``."""
