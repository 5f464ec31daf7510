"""gRPC handlers: authentication, validation and the conversion to and from the protos."""
