/* Included once by _speedups.c (one translation unit), after the declarations it uses. */

/* Stand: which method of the bridge's class a compiled callable stands in for, so that it
 * notices when the class's is replaced (mock.patch.object(ContextBridge, "get"), a
 * monkeypatched subclass) and then calls what the class has now, as a method would. */
typedef struct {
    PyObject *name;       /* "get" or "scope" */
    PyObject *original;   /* the function the class had; NULL: never replaced */
    unsigned int version; /* the class's version tag when it last had the original */
} Stand;

/* The attribute `name` of `type` as its class dictionaries hold it (borrowed), or NULL. */
static PyObject *
class_attribute(PyTypeObject *type, PyObject *name)
{
    PyObject *mro = type->tp_mro;
    if (mro == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(mro); i++) {
        PyObject *dict = ((PyTypeObject *)PyTuple_GET_ITEM(mro, i))->tp_dict;
        if (dict == NULL) { /* a static builtin type on 3.12+: not where methods are */
            continue;
        }
        PyObject *found = PyDict_GetItemWithError(dict, name);
        if (found != NULL || PyErr_Occurred()) {
            return found;
        }
    }
    return NULL;
}

/* 1: `instance`'s class still has the original method; 0: it has another; -1: an error. */
static int
stand_holds(Stand *stand, PyObject *instance)
{
    PyTypeObject *type = Py_TYPE(instance);
    if (stand->original == NULL) {
        return 1;
    }
    if (stand->version != 0 && (type->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) &&
        type->tp_version_tag == stand->version) {
        return 1; /* the class has not changed since */
    }
    PyObject *found = class_attribute(type, stand->name);
    if (found == NULL && PyErr_Occurred()) {
        return -1;
    }
    if (found != stand->original) {
        return 0;
    }
    if (type->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) {
        stand->version = type->tp_version_tag;
    }
    return 1;
}

/* Call what `instance`'s class has now under the stand's name, bound as a method. */
static PyObject *
call_replacement(Stand *stand, PyObject *instance, PyObject *const *args, size_t nargsf,
                 PyObject *kwnames)
{
    PyTypeObject *type = Py_TYPE(instance);
    PyObject *found = class_attribute(type, stand->name);
    if (found == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetObject(PyExc_AttributeError, stand->name);
        }
        return NULL;
    }
    Py_INCREF(found);
    PyObject *callable = found;
    descrgetfunc bind = Py_TYPE(found)->tp_descr_get;
    if (bind != NULL) {
        callable = bind(found, instance, (PyObject *)type);
        Py_DECREF(found);
        if (callable == NULL) {
            return NULL;
        }
    }
    PyObject *result = PyObject_Vectorcall(callable, args, nargsf, kwnames);
    Py_DECREF(callable);
    return result;
}
