"""`park ui`: a local web dashboard of the user's jobs at every configured site.

`feed` follows each site's all-jobs `Watch` stream and keeps the rows the page
lists; `views` turns records into what the page shows (a job's detail, its
condition graph, its reported values); `guard` is the per-run secret and the
Host/Origin checks every request passes; `server` assembles the Starlette app and
runs it on a loopback port. The page itself (`static/`) is plain HTML, CSS and
JavaScript with hand-drawn SVG plots and graphs: nothing is fetched from
elsewhere at run time.
"""
