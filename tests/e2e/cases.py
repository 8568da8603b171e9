"""Case tables shared by more than one test module."""

# Authorization values that are a Bearer credential but not one RFC 6750 b64token
# (1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="): the filter refuses each
# with 400 invalid_request without asking the IdP.
MALFORMED_BEARER = {
    "bearer-alone": "Bearer",
    "bearer-then-spaces": "Bearer    ",
    "two-tokens": "Bearer abc def",
    "at-sign": "Bearer abc@def",
    "comma": "Bearer abc,def",
    "quoted": 'Bearer "abcdef"',
    "padding-inside": "Bearer ab=cdef",
    "padding-only": "Bearer ===",
    "bang": "Bearer abc!def",
    "semicolon": "Bearer abc;def",
    "colon": "Bearer abc:def",
    "parens": "Bearer a(b)c",
    "backslash": "Bearer abc\\def",
    "percent": "Bearer abc%20def",
    "star": "Bearer abc*def",
    "tab-inside": "Bearer abc\tdef",
    "two-credentials": "Bearer abc, Bearer def",
    "equals-then-text": "Bearer abc==def",
}
