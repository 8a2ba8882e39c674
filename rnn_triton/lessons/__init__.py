"""Runnable lessons on recurrent networks, built on rnn_triton's modules.

    python -m rnn_triton.lessons.vanishing_gradients    # RNN vs LSTM vs GRU on a long-range memory task
"""
