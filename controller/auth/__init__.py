"""Authentication and authorisation: identities, credentials, the auth layer, sign-in views."""
