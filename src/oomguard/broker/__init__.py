"""The root broker behind oom-protect: the socket, requests and grants."""
