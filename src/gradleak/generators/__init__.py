"""Image generators trained by generative gradient-inversion attacks."""

from gradleak.generators.cinet import ChannelChoice, CINetGenerator, choose_channels

__all__ = ["CINetGenerator", "ChannelChoice", "choose_channels"]
