"""Entry points, on the top floor: the `privasr train` pipeline, the demo and the experiment
drivers. They compose the layers below (data → models → clipping/peft → train → audit /
federated); nothing below imports them. See docs/architecture.md."""
