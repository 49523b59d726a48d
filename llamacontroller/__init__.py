"""The programs: the ``llamacontroller`` command and the embedded shape, which composes the control plane
(``controller``) and the data plane (``proxy``) in one process. The only package that imports both."""
