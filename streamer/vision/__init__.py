"""Image and model code: decoding, preprocessing, the classifier. No processes, no Kafka."""
