"""The HTTP service: score, explain and generate over HTTP, and the web console.

Depends on detector/ (the model and its scores) and on streams/ only for the live alert view;
never on trainer/.
"""
