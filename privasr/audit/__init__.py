"""Memorization audit: sped-up random-word canaries, scoring, exposure, one-run ε lower bound."""
