"""Inference worker process: a batch of pixel slots in, top-k per slot out.

One per device. The work itself is ``streamer.vision`` (``Classifier`` and
``batch_handler``); this module only loads it, attaches the shared memory and
serves requests.
"""

from __future__ import annotations

import os
import signal
from multiprocessing.connection import Connection

import torch

from streamer.vision.batch import batch_handler
from streamer.vision.classifier import Classifier, InferenceConfig
from streamer.vision.device_decode import JpegBatchDecoder
from streamer.workers.child import serve
from streamer.workers.shm import SlotLayout, SlotView


def main(
    requests: Connection, replies: Connection, layout: SlotLayout, config: InferenceConfig
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if config.threads:
        torch.set_num_threads(config.threads)
    classifier = Classifier(config)
    classifier.warm_up()
    batch_seconds = classifier.time_batches(config.timed_batch_sizes)
    view = SlotView.attach(layout)
    decoder = JpegBatchDecoder(classifier.device, config.jpeg_library)
    try:
        serve(
            requests,
            replies,
            batch_handler(classifier, decoder, view.pixels, view.payload),
            ready_info={
                "pid": os.getpid(),
                "weights": classifier.weights_identity,
                "device": str(classifier.device),
                "precision": config.precision,
                "threads": torch.get_num_threads(),
                "batch_seconds": batch_seconds,  # the batch-time table t(b)
            },
        )
    finally:
        view.close()
