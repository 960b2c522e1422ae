"""The call metadata keys ragfleet reads and sends, in one place for the SDK and the services."""

REQUEST_ID_KEY = "x-request-id"
# Absolute deadline in Unix seconds: survives hops (such as Ray Serve's proxy) that drop gRPC's own.
DEADLINE_KEY = "x-ragfleet-deadline"
AUTHORIZATION_KEY = "authorization"
# Ray Serve's gRPC proxy routes on this key to the application of that name.
APPLICATION_KEY = "application"
# Names the backend when one Retriever process serves several (the gateway always sends it).
RETRIEVER_KEY = "x-ragfleet-retriever"
