"""``fastdiff serve``: one base pipeline, many LoRA adapters chosen per request over HTTP (extra ``serve``)."""
