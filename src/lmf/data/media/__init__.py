"""Images, videos and audio in the data: placeholders, files, the model's processors (LLaMA-Factory's mm_plugin
semantics). :mod:`.images`, :mod:`.videos` and :mod:`.audios` open and regularize files, :mod:`.plugins` expands
the placeholders into the model's media tokens and builds its inputs, :mod:`.collator` adds them to batches."""

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
AUDIO_PLACEHOLDER = "<audio>"
#: A sample's media files, by kind: the tokenized data's path columns (the normalized data's are ``_`` + these).
MEDIA_COLUMNS = ("images", "videos", "audios")
#: A multimodal model's processor files (image / video / audio preprocessing), which travel with what is trained from
#: it (the final output, checkpoints, exports): transformers and vLLM load the processors from the model folder.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
