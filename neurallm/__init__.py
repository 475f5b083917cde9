"""neurallm: recurrent neural language models (RNN, LSTM, GRU)."""

__version__ = "0.1.0"
