"""Datasets of the benchmarks: the ImageNet-segmentation ``.mat`` reader
(:mod:`data.imagenet_seg`) and the offline synthetic stand-in with exact
object masks (:mod:`data.synthetic`)."""
