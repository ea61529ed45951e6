"""Bottleneck features: backbones, in-graph decode and preprocessing, extraction, the content-addressed cache,
Apache Beam extraction, the tf.distribute strategy."""
