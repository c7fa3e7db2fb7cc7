/* Writing checked attributes onto an SDK span: _span_write's direct path.
 * Included once by _speedups.c (one translation unit), after the declarations it uses. */

/* ---- Writing checked attributes onto an SDK span (_span_write's direct path) ---------- */

/* An attribute of `obj`, or NULL: with an exception set, or without one (cleared) when it
 * is an AttributeError, which means "not the SDK this code knows". */
static PyObject *
sdk_attribute(PyObject *obj, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
    }
    return value;
}

/* Call `method` ("acquire" or "release") of `lock`: 0 or -1 (error set). */
static int
call_lock(PyObject *lock, PyObject *method)
{
    PyObject *result = PyObject_CallMethodNoArgs(lock, method);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

/* Add the items of `attributes` that `items` does not have: 0, or -1 (error set). */
static int
keep_existing_update(PyObject *items, PyObject *attributes)
{
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(attributes, &pos, &key, &value)) {
        if (PyDict_SetDefault(items, key, value) == NULL) {
            return -1;
        }
    }
    return 0;
}

/* Under the span's lock (held, or free as locks_free() found it): write `attributes` into
 * `items` (the store's dict; under `store_lock` when it is given, as the SDK's own writes and
 * BoundedAttributes' readers take it; with `overwrite` 0, only those it does not have yet),
 * and when `expected` is not None and the span still has that name, `renamed` too, and
 * rename the span to `name`. `maxlen`: the store's count limit,
 * or -1. 1: done or nothing to do (ended); 0: not the SDK this code knows, or a limit that now
 * applies (nothing written); -1: an error (set). */
static int
write_span_locked(PyObject *span, PyObject *store_lock, PyObject *items, Py_ssize_t maxlen,
                  PyObject *attributes, int overwrite, PyObject *expected, PyObject *name,
                  PyObject *renamed)
{
    PyObject *end = sdk_attribute(span, str_end_time);
    if (end == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    int ended = end != Py_None;
    Py_DECREF(end);
    if (ended) {
        return 1; /* an ended span stays as its exporter saw it */
    }
    if (expected != Py_None) {
        PyObject *current = sdk_attribute(span, str_name);
        if (current == NULL) {
            return PyErr_Occurred() ? -1 : 0;
        }
        int same = PyObject_RichCompareBool(current, expected, Py_EQ);
        Py_DECREF(current);
        if (same < 0) {
            return -1;
        }
        if (!same) {
            expected = Py_None; /* renamed since (by the application or a hook): kept */
        }
    }
    int rename = expected != Py_None;
    if (!rename && PyDict_GET_SIZE(attributes) == 0) {
        return 1;
    }
    if (store_lock != NULL && call_lock(store_lock, str_acquire) < 0) {
        return -1;
    }
    int done = 1;
    if (maxlen >= 0 && PyDict_GET_SIZE(items) + PyDict_GET_SIZE(attributes) +
                               (rename ? PyDict_GET_SIZE(renamed) : 0) > maxlen) {
        done = 0; /* grown since the check before the lock: the SDK's path counts drops */
    }
    else if (overwrite ? PyDict_Update(items, attributes) < 0
                       : keep_existing_update(items, attributes) < 0) {
        done = -1;
    }
    else if (rename && PyDict_Update(items, renamed) < 0) {
        done = -1;
    }
    if (store_lock != NULL) {
        HeldError held = hold_error();
        if (call_lock(store_lock, str_release) < 0) {
            drop_error(held);
            return -1;
        }
        restore_error(held);
    }
    if (done == 1 && rename && PyObject_SetAttr(span, str_name, name) < 0) {
        return -1;
    }
    return done;
}

/* 1 when `lock` is a threading.Lock nobody holds, 0 when it is held or of another type, -1 on
 * an error (set). */
static int
lock_is_free(PyObject *lock)
{
    if ((PyObject *)Py_TYPE(lock) != config.lock_type) {
        return 0;
    }
    PyObject *held = PyObject_CallMethodNoArgs(lock, str_locked);
    if (held == NULL) {
        return -1;
    }
    int nobody = held == Py_False;
    Py_DECREF(held);
    return nobody;
}

/* 1 when `v` is an attribute value whose release runs no Python code: an exact str, int,
 * float, bool or None, or an exact tuple of those. */
static int
plain_value(PyObject *v)
{
    if (PyUnicode_CheckExact(v) || PyLong_CheckExact(v) || PyFloat_CheckExact(v) ||
        PyBool_Check(v) || v == Py_None) {
        return 1;
    }
    if (!PyTuple_CheckExact(v)) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(v); i++) {
        PyObject *item = PyTuple_GET_ITEM(v, i);
        if (!(PyUnicode_CheckExact(item) || PyLong_CheckExact(item) || PyFloat_CheckExact(item) ||
              PyBool_Check(item) || item == Py_None)) {
            return 0;
        }
    }
    return 1;
}

/* 1 when every key of `dict` is an exact str and, with `values`, every value is plain: then
 * looking keys up, inserting and replacing values run no Python code (no __eq__ of a str
 * subclass, no __del__ of a replaced value). */
static int
plain_items(PyObject *dict, int values)
{
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(dict, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key) || (values && !plain_value(value))) {
            return 0;
        }
    }
    return 1;
}

/* 1 when each key of `adding` (exact str) replaces nothing in `items` or a plain value (its
 * release runs no Python code), 0 otherwise, -1 on error. */
static int
plain_replacing(PyObject *items, PyObject *adding)
{
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(adding, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key)) {
            return 0;
        }
        PyObject *old = PyDict_GetItemWithError(items, key); /* borrowed */
        if (old == NULL ? PyErr_Occurred() != NULL : !plain_value(old)) {
            return old == NULL ? -1 : 0;
        }
    }
    return 1;
}

/* 1 when the write may skip taking the two locks: the span is the SDK's own class (plain
 * attributes: reading and writing them runs no Python code), its name (when it is to be
 * compared and replaced) is plain, its attributes' keys are exact str, the values the write
 * replaces are plain (see plain_replacing), and nobody holds its lock or its store's. The GIL is held from here to the end of the write and no Python
 * code runs in between, so no other thread can enter the sections those locks guard (end(),
 * the SDK's writes, BoundedAttributes' deepcopy) until the write is done: taking them would
 * change nothing but the cost (four method calls). Without a GIL (a free-threaded build that
 * runs with it off) the locks are always taken. 0: take the locks; -1: an error (set). */
static int
locks_free(PyObject *span, PyObject *lock, PyObject *store_lock, PyObject *items,
           PyObject *attributes, PyObject *expected, PyObject *renamed)
{
#ifdef Py_GIL_DISABLED
    return 0;
#else
    if ((PyObject *)Py_TYPE(span) != config.span_type || !plain_items(items, 0)) {
        return 0; /* (keys of another type may compare in Python code) */
    }
    int plain = plain_replacing(items, attributes);
    if (plain != 1) {
        return plain;
    }
    if (expected != Py_None) {
        if (!PyUnicode_CheckExact(expected) || (plain = plain_replacing(items, renamed)) != 1) {
            return plain == 1 ? 0 : plain;
        }
        PyObject *current = sdk_attribute(span, str_name);
        if (current == NULL) {
            return PyErr_Occurred() ? -1 : 0;
        }
        int named = PyUnicode_CheckExact(current);
        Py_DECREF(current);
        if (!named) {
            return 0;
        }
    }
    int nobody = lock_is_free(lock);
    if (nobody != 1) {
        return nobody;
    }
    return lock_is_free(store_lock);
#endif
}

/* write_span(span, attributes, overwrite, expected, name, renamed): see
 * _span_write.write_attributes and rename_span. True: written (or nothing to do); False: the caller takes the public path. */
static PyObject *
write_span(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "write_span() takes 6 arguments");
        return NULL;
    }
    PyObject *span = args[0], *attributes = args[1], *expected = args[3], *name = args[4];
    PyObject *renamed = args[5];
    int overwrite = PyObject_IsTrue(args[2]);
    if (overwrite < 0) {
        return NULL;
    }
    PyObject *store = NULL, *probe = NULL, *items = NULL, *lock = NULL, *store_lock = NULL;
    int done = 0;
    if (!configured || !PyDict_CheckExact(attributes) ||
        (expected != Py_None && (!PyUnicode_Check(name) || !PyDict_CheckExact(renamed)))) {
        Py_RETURN_FALSE;
    }
    Py_ssize_t adding = PyDict_GET_SIZE(attributes) +
                        (expected != Py_None ? PyDict_GET_SIZE(renamed) : 0);
    if ((store = sdk_attribute(span, str_span_attributes)) == NULL) {
        goto out;
    }
    if ((PyObject *)Py_TYPE(store) != config.bounded_type) {
        goto out;
    }
    if ((probe = sdk_attribute(store, str_max_value_len)) == NULL || probe != Py_None) {
        goto out; /* a length limit: the SDK truncates */
    }
    Py_CLEAR(probe);
    if ((items = sdk_attribute(store, str_dict)) == NULL || !PyDict_CheckExact(items)) {
        goto out;
    }
    if ((probe = sdk_attribute(store, str_maxlen)) == NULL) {
        goto out;
    }
    Py_ssize_t maxlen = -1;
    if (probe != Py_None) {
        maxlen = PyLong_Check(probe) ? PyLong_AsSsize_t(probe) : -1;
        if (maxlen < 0) {
            PyErr_Clear();
            goto out;
        }
        if (PyDict_GET_SIZE(items) + adding > maxlen) {
            goto out; /* the SDK would drop some: its own path counts them */
        }
    }
    if ((lock = sdk_attribute(span, str_lock)) == NULL ||
        (store_lock = sdk_attribute(store, str_lock)) == NULL) {
        goto out;
    }
    int unlocked = locks_free(span, lock, store_lock, items, attributes, expected, renamed);
    if (unlocked != 0) {
        done = unlocked < 0 ? -1 : write_span_locked(span, NULL, items, maxlen, attributes,
                                                     overwrite, expected, name, renamed);
        goto out;
    }
    if (call_lock(lock, str_acquire) < 0) {
        done = -1;
        goto out;
    }
    done = write_span_locked(span, store_lock, items, maxlen, attributes, overwrite, expected,
                             name, renamed);
    HeldError held = hold_error(); /* release the lock whatever happened */
    if (call_lock(lock, str_release) < 0) {
        drop_error(held);
        done = -1;
    }
    else {
        restore_error(held);
    }
out:
    Py_XDECREF(store);
    Py_XDECREF(probe);
    Py_XDECREF(items);
    Py_XDECREF(lock);
    Py_XDECREF(store_lock);
    if (done < 0 || (done == 0 && PyErr_Occurred())) {
        return NULL;
    }
    return PyBool_FromLong(done);
}

/* stamp_plain(span, plain, values): _scope.stamp's common case for a span known to be
 * recording: every value is None (left out) or a str of a field in `plain` (field name ->
 * attribute name: shown as it is), written with write_span. True when written, NotImplemented
 * when the Python code must do it (another value, a span the direct write does not apply to). */
static PyObject *
stamp_plain(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "stamp_plain() takes 3 arguments");
        return NULL;
    }
    PyObject *span = args[0], *plain = args[1], *values = args[2];
    if (!PyDict_CheckExact(plain) || !PyDict_CheckExact(values)) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    PyObject *attributes = PyDict_New();
    if (attributes == NULL) {
        return NULL;
    }
    Py_ssize_t pos = 0;
    PyObject *name, *value;
    while (PyDict_Next(values, &pos, &name, &value)) {
        if (value == Py_None) {
            continue;
        }
        PyObject *attribute = PyUnicode_CheckExact(value)
                                  ? PyDict_GetItemWithError(plain, name) /* borrowed */
                                  : NULL;
        if (attribute == NULL || PyDict_SetItem(attributes, attribute, value) < 0) {
            Py_DECREF(attributes);
            if (PyErr_Occurred()) {
                return NULL;
            }
            Py_RETURN_NOTIMPLEMENTED;
        }
    }
    PyObject *written = Py_True;
    Py_INCREF(written);
    if (PyDict_GET_SIZE(attributes) > 0) {
        Py_DECREF(written);
        PyObject *argv[6] = {span, attributes, Py_True, Py_None, Py_None, Py_None};
        written = write_span(NULL, argv, 6);
    }
    Py_DECREF(attributes);
    if (written == NULL) {
        return NULL;
    }
    if (written != Py_True) {
        Py_DECREF(written);
        Py_RETURN_NOTIMPLEMENTED;
    }
    return written;
}
