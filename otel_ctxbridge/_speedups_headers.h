/* ASGI header lists, for TraceHeaderShield, InboundReader and the request-id echo: the loops
 * over every header of every request. Included once by _speedups.c (one translation unit).
 *
 * Each function handles the shape every ASGI server sends (a list or tuple of (bytes, bytes)
 * tuples) and answers None (or NotImplemented where None is an answer) for any other shape,
 * which the Python code then handles as before. Walking a list runs no Python code (bytes
 * hashing and comparison only); where a loop allocates (which may start a garbage collection,
 * and so finalizers), it holds references to what it reads and re-checks the list's size. */

/* The number of headers in `headers`, or -1 when it is not a list or tuple. */
static Py_ssize_t
header_count(PyObject *headers)
{
    if (PyList_CheckExact(headers)) {
        return PyList_GET_SIZE(headers);
    }
    if (PyTuple_CheckExact(headers)) {
        return PyTuple_GET_SIZE(headers);
    }
    return -1;
}

/* Item `i` of `headers` (a list or tuple) as (name, value): 1 when it is a 2-tuple of
 * bytes, 0 when it is not. */
static int
header_pair(PyObject *headers, Py_ssize_t i, PyObject **name, PyObject **value)
{
    PyObject *item = PyList_CheckExact(headers) ? PyList_GET_ITEM(headers, i)
                                                : PyTuple_GET_ITEM(headers, i);
    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2) {
        return 0;
    }
    *name = PyTuple_GET_ITEM(item, 0);
    *value = PyTuple_GET_ITEM(item, 1);
    return PyBytes_CheckExact(*name) && PyBytes_CheckExact(*value);
}

static int
has_backslash(PyObject *raw)
{
    return memchr(PyBytes_AS_STRING(raw), '\\', (size_t)PyBytes_GET_SIZE(raw)) != NULL;
}

/* 1 when header name `name` has an upper-case ASCII letter: OTel reads names lowered, so
 * such a header goes through the shield's full path, which lowers them too. */
static int
has_upper(PyObject *name)
{
    const char *text = PyBytes_AS_STRING(name);
    for (Py_ssize_t i = 0; i < PyBytes_GET_SIZE(name); i++) {
        if (text[i] >= 'A' && text[i] <= 'Z') {
            return 1;
        }
    }
    return 0;
}

/* collect_headers(headers, wanted): {name: [value, ...]} of the headers named in `wanted` (a
 * frozenset of bytes), values in arrival order; None when there are none; NotImplemented for
 * another shape. See _inbound.InboundReader.read. */
static PyObject *
collect_headers(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "collect_headers() takes 2 arguments");
        return NULL;
    }
    PyObject *headers = args[0], *wanted = args[1];
    Py_ssize_t count = header_count(headers);
    if (count < 0 || !PyFrozenSet_CheckExact(wanted)) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    for (Py_ssize_t i = 0; i < count; i++) { /* the shape first: no half-built answer */
        PyObject *name, *value;
        if (!header_pair(headers, i, &name, &value) || has_upper(name)) {
            Py_RETURN_NOTIMPLEMENTED; /* (names not in lower case: Python lowers them) */
        }
    }
    PyObject *found = NULL;
    Py_INCREF(headers);
    for (Py_ssize_t i = 0; i < header_count(headers); i++) {
        PyObject *name, *value;
        if (!header_pair(headers, i, &name, &value) || has_upper(name)) { /* changed by a
                                                                          * finalizer: Python's */
            Py_XDECREF(found);
            Py_DECREF(headers);
            Py_RETURN_NOTIMPLEMENTED;
        }
        int named = PySet_Contains(wanted, name);
        if (named < 0) {
            goto error;
        }
        if (!named) {
            continue;
        }
        Py_INCREF(name);
        Py_INCREF(value);
        int added = -1;
        PyObject *values = NULL;
        if (found == NULL && (found = PyDict_New()) == NULL) {
            goto release;
        }
        values = PyDict_GetItemWithError(found, name); /* borrowed: the dict holds it */
        if (values == NULL) {
            if (PyErr_Occurred() || (values = PyList_New(0)) == NULL) {
                goto release;
            }
            int stored = PyDict_SetItem(found, name, values);
            Py_DECREF(values);
            if (stored < 0) {
                goto release;
            }
        }
        added = PyList_Append(values, value);
    release:
        Py_DECREF(name);
        Py_DECREF(value);
        if (added < 0) {
            goto error;
        }
    }
    Py_DECREF(headers);
    if (found == NULL) {
        Py_RETURN_NONE;
    }
    return found;
error:
    Py_XDECREF(found);
    Py_DECREF(headers);
    return NULL;
}

/* 1 when `key` equals `name` (lower case) ignoring ASCII case, as `key.lower() == name`. */
static int
same_header_name(PyObject *key, PyObject *name)
{
    Py_ssize_t size = PyBytes_GET_SIZE(key);
    if (size != PyBytes_GET_SIZE(name)) {
        return 0;
    }
    const unsigned char *a = (const unsigned char *)PyBytes_AS_STRING(key);
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(name);
    for (Py_ssize_t i = 0; i < size; i++) {
        unsigned char c = a[i];
        if (c >= 'A' && c <= 'Z') {
            c = (unsigned char)(c + ('a' - 'A'));
        }
        if (c != b[i]) {
            return 0;
        }
    }
    return 1;
}

/* append_header(message, name, value): unless a header named `name` (lower case; compared
 * ignoring ASCII case) is in message["headers"], set message["headers"] to a new list of
 * them and (name, value). True when done (added or already there), None for another shape.
 * See _exchange.Exchange._add_echo. */
static PyObject *
append_header(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "append_header() takes 3 arguments");
        return NULL;
    }
    PyObject *message = args[0], *name = args[1], *value = args[2];
    if (!PyDict_CheckExact(message) || !PyBytes_CheckExact(name) || !PyBytes_CheckExact(value)) {
        Py_RETURN_NONE;
    }
    PyObject *headers = PyDict_GetItemWithError(message, str_headers); /* borrowed */
    if (headers == NULL && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t count = 0;
    if (headers != NULL && headers != Py_None) {
        if ((count = header_count(headers)) < 0) {
            Py_RETURN_NONE;
        }
    }
    Py_XINCREF(headers); /* borrowed from the message: held while allocating below */
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *key, *present;
        if (!header_pair(headers, i, &key, &present)) {
            Py_DECREF(headers);
            Py_RETURN_NONE;
        }
        if (same_header_name(key, name)) {
            Py_DECREF(headers);
            Py_RETURN_TRUE; /* the application set its own */
        }
    }
    PyObject *pair = PyTuple_Pack(2, name, value);
    if (pair == NULL) {
        Py_XDECREF(headers);
        return NULL;
    }
    PyObject *added = headers != NULL && headers != Py_None ? PySequence_List(headers)
                                                            : PyList_New(0);
    Py_XDECREF(headers);
    if (added == NULL || PyList_Append(added, pair) < 0) {
        Py_XDECREF(added);
        Py_DECREF(pair);
        return NULL;
    }
    Py_DECREF(pair);
    int stored = PyDict_SetItem(message, str_headers, added);
    Py_DECREF(added);
    if (stored < 0) {
        return NULL;
    }
    Py_RETURN_TRUE;
}

/* trace_headers(headers, others): (traceparent values, tracestate values), each a sequence
 * of bytes in arrival order, when no header is named in `others` (a frozenset of bytes), none
 * has an upper-case name and none a backslash in its name or value; None when one does, or
 * for another shape. See _shield.TraceHeaderShield: a request without trace headers, or
 * whose only trace headers need no change, passes on as it came. */
static PyObject *
trace_headers(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "trace_headers() takes 2 arguments");
        return NULL;
    }
    PyObject *headers = args[0], *others = args[1];
    if (header_count(headers) < 0 || !PyFrozenSet_CheckExact(others)) {
        Py_RETURN_NONE;
    }
    PyObject *parents = NULL, *states = NULL, *result = NULL; /* lists made when needed */
    Py_INCREF(headers);
    for (Py_ssize_t i = 0; i < header_count(headers); i++) {
        PyObject *name, *value;
        if (!header_pair(headers, i, &name, &value) || has_backslash(name) ||
            has_backslash(value) || has_upper(name)) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        int other = PySet_Contains(others, name);
        if (other < 0) {
            goto done;
        }
        if (other) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        PyObject **into = NULL;
        if (PyBytes_GET_SIZE(name) == 11 &&
            memcmp(PyBytes_AS_STRING(name), "traceparent", 11) == 0) {
            into = &parents;
        }
        else if (PyBytes_GET_SIZE(name) == 10 &&
                 memcmp(PyBytes_AS_STRING(name), "tracestate", 10) == 0) {
            into = &states;
        }
        if (into == NULL) {
            continue;
        }
        Py_INCREF(value); /* held while allocating (a collection may run finalizers) */
        int added = (*into != NULL || (*into = PyList_New(0)) != NULL)
                        ? PyList_Append(*into, value)
                        : -1;
        Py_DECREF(value);
        if (added < 0) {
            goto done;
        }
    }
    if (parents == NULL && states == NULL) {
        result = Py_NewRef(no_trace_headers);
    }
    else {
        result = PyTuple_Pack(2, parents != NULL ? parents : empty_tuple,
                              states != NULL ? states : empty_tuple);
    }
done:
    Py_DECREF(headers);
    Py_XDECREF(parents);
    Py_XDECREF(states);
    return result;
}

/* 1 when the `n` bytes at `p` are lower-case hex digits, 0 otherwise; `*nonzero` tells
 * whether one of them is not '0'. */
static int
lower_hex(const char *p, Py_ssize_t n, int *nonzero)
{
    *nonzero = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        char c = p[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) {
            return 0;
        }
        *nonzero |= c != '0';
    }
    return 1;
}

/* traceparent_ready(value): True when `value` (bytes) is a traceparent already in the form the
 * shield gives one (tracecontext.parse_traceparent returns it unchanged): "00-", 32 lower-case
 * hex digits, "-", 16, "-", 2, 55 bytes in all, neither id all zeros. False otherwise (the
 * shield then parses it in Python). */
static PyObject *
traceparent_ready(PyObject *Py_UNUSED(module), PyObject *value)
{
    if (!PyBytes_CheckExact(value) || PyBytes_GET_SIZE(value) != 55) {
        Py_RETURN_FALSE;
    }
    const char *p = PyBytes_AS_STRING(value);
    int trace_set, parent_set, any_flag;
    int ready = p[0] == '0' && p[1] == '0' && p[2] == '-' && p[35] == '-' && p[52] == '-' &&
                lower_hex(p + 3, 32, &trace_set) && trace_set &&
                lower_hex(p + 36, 16, &parent_set) && parent_set && lower_hex(p + 53, 2, &any_flag);
    return PyBool_FromLong(ready);
}

static int
ascii_alnum(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
}

/* request_id_ready(raw, max_length): `raw` (bytes) as text when it is a safe request-id token
 * (fields.REQUEST_ID_PATTERN: [A-Za-z0-9][A-Za-z0-9._:+/=@-]{0,127}, all ASCII) of at most
 * `max_length` characters: then it is a valid value of a request id field without a
 * validator. None otherwise (the Python code checks it, and counts a refusal). */
static PyObject *
request_id_ready(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "request_id_ready() takes 2 arguments");
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!PyBytes_CheckExact(args[0])) {
        Py_RETURN_NONE;
    }
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    if (size < 1 || size > 128 || size > limit || !ascii_alnum(raw[0])) {
        Py_RETURN_NONE;
    }
    for (Py_ssize_t i = 1; i < size; i++) {
        unsigned char c = raw[i];
        if (!ascii_alnum(c) && c != '.' && c != '_' && c != ':' && c != '+' && c != '/' &&
            c != '=' && c != '@' && c != '-') {
            Py_RETURN_NONE;
        }
    }
    return PyUnicode_DecodeASCII((const char *)raw, size, NULL);
}
