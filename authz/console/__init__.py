"""The web console for workspace members: a backend-for-frontend and its static pages.

The browser never holds a token: this process signs the member in (OpenID Connect code flow
with PKCE), keeps the tokens in a server-side session behind an HttpOnly cookie, and forwards
the member's JWT to the public key management API over gRPC. See docs/console.md.
"""
