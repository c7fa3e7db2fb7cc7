/* FieldGetter: the compiled bridge.get.
 * Included once by _speedups.c (one translation unit), after the declarations it uses. */

/* FieldGetter: what bridge.get is when this module is built. It answers from the bridge's
 * read cache (ContextBridge._last: the context read twice in a row and every field's value
 * in it, MISSING when unset) and leaves every other case to the Python method. */
typedef struct {
    PyObject_HEAD
    PyObject *bridge;
    PyObject *attributes; /* the bridge's __dict__, where _last is kept */
    PyObject *missing;    /* _state.MISSING */
    PyObject *fallback;   /* the bridge's Python get, bound */
    Stand stand;          /* ContextBridge.get */
    vectorcallfunc vectorcall;
} FieldGetter;

static PyObject *str_last;  /* "_last" */

static PyObject *
getter_vectorcall(FieldGetter *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    int holds = self->bridge == NULL ? -1 : stand_holds(&self->stand, self->bridge);
    if (holds <= 0) {
        return holds < 0 ? NULL : call_replacement(&self->stand, self->bridge, args, nargsf, kwnames);
    }
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames == NULL && (nargs == 1 || nargs == 2) && PyUnicode_CheckExact(args[0]) &&
        configured && self->attributes != NULL) {
        /* An exact str name: the lookups below run no Python code. */
        PyObject *last = PyDict_GetItemWithError(self->attributes, str_last);
        if (last == NULL && PyErr_Occurred()) {
            return NULL;
        }
        if (last != NULL && PyTuple_CheckExact(last) && PyTuple_GET_SIZE(last) == 3 &&
            PyDict_CheckExact(PyTuple_GET_ITEM(last, 1))) {
            PyObject *ctx = NULL;
            if (PyContextVar_Get(config.var, NULL, &ctx) < 0) {
                return NULL;
            }
            int cached = ctx != NULL && ctx == PyTuple_GET_ITEM(last, 0);
            Py_XDECREF(ctx); /* the cache holds the context: its identity stays valid */
            if (cached) {
                PyObject *value = PyDict_GetItemWithError(PyTuple_GET_ITEM(last, 1), args[0]);
                if (value == NULL && PyErr_Occurred()) {
                    return NULL;
                }
                if (value != NULL) {
                    if (value == self->missing) {
                        value = nargs == 2 ? args[1] : Py_None;
                    }
                    Py_INCREF(value);
                    return value;
                }
            }
        }
    }
    if (self->fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this bridge is being destroyed");
        return NULL;
    }
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

static PyObject *
getter_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *bridge, *attributes, *missing, *fallback, *original = NULL;
    static char *names[] = {"bridge", "attributes", "missing", "fallback", "original", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!OO|O:FieldGetter", names, &bridge,
                                     &PyDict_Type, &attributes, &missing, &fallback,
                                     &original)) {
        return NULL;
    }
    FieldGetter *self = PyObject_GC_New(FieldGetter, type);
    if (self == NULL) {
        return NULL;
    }
    if (original == Py_None) {
        original = NULL;
    }
    Py_INCREF(bridge);
    Py_INCREF(attributes);
    Py_INCREF(missing);
    Py_INCREF(fallback);
    Py_XINCREF(original);
    self->bridge = bridge;
    self->attributes = attributes;
    self->missing = missing;
    self->fallback = fallback;
    self->stand.name = str_get;
    self->stand.original = original;
    self->stand.version = 0;
    self->vectorcall = (vectorcallfunc)getter_vectorcall;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int
getter_traverse(FieldGetter *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->bridge);
    Py_VISIT(self->attributes);
    Py_VISIT(self->missing);
    Py_VISIT(self->fallback);
    Py_VISIT(self->stand.original);
    return 0;
}

static int
getter_clear(FieldGetter *self)
{
    Py_CLEAR(self->bridge);
    Py_CLEAR(self->attributes);
    Py_CLEAR(self->missing);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->stand.original);
    return 0;
}

static void
getter_dealloc(FieldGetter *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    getter_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyMemberDef getter_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(FieldGetter, vectorcall), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot getter_slots[] = {
    {Py_tp_doc, "get(name, default=None): the value of field name in the current context, "
                "or default when unset; see ContextBridge.get."},
    {Py_tp_new, getter_new},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_dealloc, getter_dealloc},
    {Py_tp_traverse, getter_traverse},
    {Py_tp_clear, getter_clear},
    {Py_tp_members, getter_members},
    {Py_tp_getset, getter_getset},
    {0, NULL},
};

static PyType_Spec getter_spec = {
    .name = "otel_ctxbridge._speedups.FieldGetter",
    .basicsize = sizeof(FieldGetter),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = getter_slots,
};
