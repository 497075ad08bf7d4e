"""Images (and, later, videos) in the data: placeholders, files, the model's image processor (LLaMA-Factory's
mm_plugin semantics). :mod:`.images` opens and resizes files, :mod:`.plugins` expands ``<image>`` into the model's
vision tokens and builds the pixel inputs, :mod:`.collator` adds them to batches."""

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
AUDIO_PLACEHOLDER = "<audio>"
