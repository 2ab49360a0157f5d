"""A TorchServe handler that answers a constant without reading the request: what the
server itself costs per request, with no decoding and no model."""


class NoopHandler:
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        return ["0"] * len(data)
