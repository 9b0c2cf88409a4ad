"""The syft-flwr wire format: drive unchanged syft-flwr data owners.

The daemon's own pipeline runs unchanged against a private spool folder in the
state directory; this package translates at the edge:

- ``SyftFlwrPublisher`` turns each task into a syft-rpc ``.request`` holding a
  Flower ``Message`` (written atomically into the data owner's app folder);
- ``ReplyTranslator`` turns each ``.response`` into a native result file in the
  spool, where the ordinary intake counts it;
- ``Bridge`` watches the data owners' folders, keeps presence, and sends the
  stop message when the job ends.

Only ``flower_codec`` imports Flower (the ``[syft-flwr]`` extra).
"""
