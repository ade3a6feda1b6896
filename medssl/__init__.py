"""medssl: self-supervised pretraining and few-label evaluation for medical imaging."""
__version__ = "0.1.0"
