/* A response starts (part of _speedups.c): Exchange._started's common case in one call.
 *
 * response_started(exchange, message): echo the request id (append_header) and, when the
 * router matched a route outside any mount and FastAPI took no part, rename the server span
 * after its template and set http.route (write_span), as _exchange.Exchange._started does.
 * True when done; NotImplemented when the Python code must do it (a value changed with
 * update(), a route under a mount, FastAPI, no route matched, a span the direct write does
 * not apply to, another shape): adding the echo header again is a no-op, so the Python code
 * may redo the whole step. */

static PyObject *str_echo;          /* "echo" */
static PyObject *str_mw;            /* "mw" */
static PyObject *str_rid_header;    /* "_rid_header" */
static PyObject *str_named;         /* "named" */
static PyObject *str_spans;         /* "spans" */
static PyObject *str_route;         /* "route" */
static PyObject *str_path_format;   /* "path_format" */
static PyObject *str_fastapi;       /* "fastapi" */
static PyObject *str_root_path;     /* "root_path" */
static PyObject *str_app_root_path; /* "app_root_path" */
static PyObject *str_http_route;    /* "http.route" */
static PyObject *mount_tail;        /* "/{path}": the end of a Mount's template */

static int
response_strings(void)
{
    str_echo = PyUnicode_InternFromString("echo");
    str_mw = PyUnicode_InternFromString("mw");
    str_rid_header = PyUnicode_InternFromString("_rid_header");
    str_named = PyUnicode_InternFromString("named");
    str_spans = PyUnicode_InternFromString("spans");
    str_route = PyUnicode_InternFromString("route");
    str_path_format = PyUnicode_InternFromString("path_format");
    str_fastapi = PyUnicode_InternFromString("fastapi");
    str_root_path = PyUnicode_InternFromString("root_path");
    str_app_root_path = PyUnicode_InternFromString("app_root_path");
    str_http_route = PyUnicode_InternFromString("http.route");
    mount_tail = PyUnicode_InternFromString("/{path}");
    return str_echo && str_mw && str_rid_header && str_named && str_spans && str_route &&
                   str_path_format && str_fastapi && str_root_path && str_app_root_path &&
                   str_http_route && mount_tail
               ? 0
               : -1;
}

/* The request id echoed into message: 1 done, 0 for the Python code, -1 error. */
static int
echo_request_id(PyObject *exchange, PyObject *message)
{
    PyObject *echo = PyObject_GetAttr(exchange, str_echo);
    if (echo == NULL) {
        return -1;
    }
    if (echo == Py_None) {
        Py_DECREF(echo);
        return 1;
    }
    PyObject *mw = PyObject_GetAttr(exchange, str_mw);
    PyObject *header = mw != NULL ? PyObject_GetAttr(mw, str_rid_header) : NULL;
    Py_XDECREF(mw);
    if (header == NULL) {
        Py_DECREF(echo);
        return -1;
    }
    PyObject *argv[3] = {message, header, echo};
    PyObject *added = append_header(NULL, argv, 3);
    Py_DECREF(header);
    Py_DECREF(echo);
    if (added == NULL) {
        return -1;
    }
    int done = added == Py_True;
    Py_DECREF(added);
    return done;
}

/* The route template to name the span after (new reference), NULL with no error set when the
 * Python code must work it out. The same test as _routes.route_template's first steps. */
static PyObject *
plain_route(PyObject *scope)
{
    if (!PyDict_CheckExact(scope)) {
        return NULL;
    }
    PyObject *route = PyDict_GetItemWithError(scope, str_route); /* borrowed */
    if (route == NULL) {
        return NULL;
    }
    Py_INCREF(route); /* borrowed: a path_format property may change the scope */
    PyObject *template = PyObject_GetAttr(route, str_path_format);
    Py_DECREF(route);
    if (template == NULL) {
        PyErr_Clear(); /* no template: the Python code decides */
        return NULL;
    }
    PyObject *root = PyDict_GetItemWithError(scope, str_root_path);        /* borrowed */
    PyObject *app_root = PyDict_GetItemWithError(scope, str_app_root_path); /* borrowed */
    int plain = !PyErr_Occurred() && PyUnicode_CheckExact(template) &&
                PyUnicode_GET_LENGTH(template) > 0 &&
                PyUnicode_Tailmatch(template, mount_tail, 0, PY_SSIZE_T_MAX, 1) == 0 &&
                (root == NULL || PyUnicode_CheckExact(root));
    if (plain && app_root != NULL) { /* a Starlette router ran: no mount took a prefix? */
        plain = PyUnicode_CheckExact(app_root) &&
                PyUnicode_Compare(app_root, root != NULL ? root : Py_None) == 0;
    }
    if (plain) { /* FastAPI may keep another (include_router's) template */
        Py_XINCREF(root); /* borrowed: held while the look-up below runs */
        int fastapi = PyDict_Contains(scope, str_fastapi);
        plain = fastapi == 0;
        if (plain && (root == NULL || PyUnicode_GET_LENGTH(root) == 0)) {
            Py_XDECREF(root);
            return template;
        }
        if (plain) {
            PyObject *full = PyUnicode_Concat(root, template);
            Py_DECREF(root);
            Py_DECREF(template);
            return full;
        }
        Py_XDECREF(root);
    }
    PyErr_Clear();
    Py_DECREF(template);
    return NULL;
}

/* The rename: 1 done (or nothing to do), 0 for the Python code, -1 error. */
static int
rename_after_route(PyObject *exchange, PyObject *span)
{
    PyObject *named = PyObject_GetAttr(exchange, str_named);
    if (named == NULL) {
        return -1;
    }
    if (named == Py_None) {
        Py_DECREF(named);
        return 1;
    }
    Py_ssize_t space = PyUnicode_CheckExact(named)
                           ? PyUnicode_FindChar(named, ' ', 0, PyUnicode_GET_LENGTH(named), 1)
                           : -3;
    if (space < 0) {
        Py_DECREF(named);
        return space == -1 ? 1 : (space == -2 ? -1 : 0); /* no method part: kept */
    }
    PyObject *scope = PyObject_GetAttr(exchange, str_scope);
    if (scope == NULL) {
        Py_DECREF(named);
        return -1;
    }
    PyObject *route = plain_route(scope);
    Py_DECREF(scope);
    if (route == NULL) {
        Py_DECREF(named);
        return PyErr_Occurred() ? -1 : 0;
    }
    int done = -1;
    PyObject *name = NULL, *renamed = NULL, *empty = NULL, *written = NULL;
    PyObject *method = PyUnicode_Substring(named, 0, space + 1); /* "GET " */
    if (method == NULL || (name = PyUnicode_Concat(method, route)) == NULL ||
        (renamed = PyDict_New()) == NULL || PyDict_SetItem(renamed, str_http_route, route) < 0 ||
        (empty = PyDict_New()) == NULL) {
        goto out;
    }
    PyObject *argv[6] = {span, empty, Py_True, named, name, renamed};
    written = write_span(NULL, argv, 6);
    if (written != NULL) {
        done = written == Py_True;
    }
out:
    Py_XDECREF(method);
    Py_XDECREF(name);
    Py_XDECREF(renamed);
    Py_XDECREF(empty);
    Py_XDECREF(written);
    Py_DECREF(route);
    Py_DECREF(named);
    return done;
}

static PyObject *
response_started(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "response_started() takes 2 arguments");
        return NULL;
    }
    PyObject *exchange = args[0], *message = args[1];
    PyObject *frame = PyObject_GetAttr(exchange, str_frame);
    if (frame == NULL) {
        return NULL;
    }
    PyObject *updates = PyObject_GetAttr(frame, str_updates);
    Py_ssize_t changed = updates != NULL ? PyObject_Length(updates) : -1;
    Py_XDECREF(updates);
    PyObject *spans = changed == 0 ? PyObject_GetAttr(frame, str_spans) : NULL;
    Py_DECREF(frame);
    if (changed != 0) { /* update() changed a value: the Python code reads the request id */
        if (changed < 0) {
            return NULL;
        }
        Py_RETURN_NOTIMPLEMENTED;
    }
    if (spans == NULL) {
        return NULL;
    }
    int done = echo_request_id(exchange, message);
    if (done == 1 && PyTuple_CheckExact(spans) && PyTuple_GET_SIZE(spans) > 0) {
        done = rename_after_route(exchange, PyTuple_GET_ITEM(spans, 0));
    }
    else if (done == 1 && !PyTuple_CheckExact(spans)) {
        done = 0;
    }
    Py_DECREF(spans);
    if (done < 0) {
        return NULL;
    }
    if (done == 0) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    Py_RETURN_TRUE;
}
