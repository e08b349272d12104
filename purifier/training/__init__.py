"""Training: WGAN-GP generators (`gan`), encoders (`encoder`), classifiers (`classifier`),
bounded-size checkpoints (`parts`) and export selection (`selection`)."""
