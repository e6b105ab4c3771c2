"""Deploying a family: the relay state, sampling, the decoding strategies (cached, relay,
confidence exits, self-speculation) and `decoder.Decoder`, what users call."""
