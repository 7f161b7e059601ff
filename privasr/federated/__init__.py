"""Federated learning with user-level DP on Flower (docs/federated.md): clients are speakers.

    config.py      the ``privasr fl`` recipe (FLConfig)
    clip.py        clip one client delta: global, per-layer bounds, or the "uniform" rule
    aggregate.py   Σ clip(Δ_c) + σ·C·ξ, divided by the expected cohort size
    optim.py       server optimizers: FedAvg, Adam, LAMB (layer-wise trust ratio)
    cohort.py      Poisson / fixed-size cohort sampling of speakers
    accounting.py  the user-level ledger and the extrapolation table
    client.py      a speaker's local update with the ordinary Trainer
    server.py      the server state: model, optimizer, ledger, round; atomic checkpoints
    env.py         Flower's environment (no telemetry, no run-time installs, FLWR_HOME)
    app.py         the Flower ServerApp / ClientApp and the Simulation Runtime entry point
"""
